"""Prompt templates, one versioned file each, shipped as package data."""
