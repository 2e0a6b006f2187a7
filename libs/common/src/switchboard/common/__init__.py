"""Shared runtime of the Switchboard services."""
