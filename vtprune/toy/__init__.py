"""Toy models: tiny random-weight VLMs for tests and the default CLI job."""
