"""Switchboard scheduler service."""
