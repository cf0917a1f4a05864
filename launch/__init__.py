"""Thin absl entry points; all logic lives in the stnjax library."""
