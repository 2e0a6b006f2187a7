"""Switchboard command line."""
