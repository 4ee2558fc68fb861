"""Eco advice: what an idle card costs a year, and why it draws more than it should."""
