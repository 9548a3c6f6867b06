"""Typed settings, one group per component, validated at start-up with all errors at once."""
