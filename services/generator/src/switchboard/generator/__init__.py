"""Switchboard generator service."""
