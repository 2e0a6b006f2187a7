"""Switchboard gateway service."""
