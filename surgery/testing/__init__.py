"""Test and lab support: tiny in-process models, the CI model organism, a small fine-tuning loop. No repair code imports it."""
