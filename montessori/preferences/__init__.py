"""Preference pairs: which of the teacher's completions for one generation prompt helped the student."""
