"""Switchboard router service."""
