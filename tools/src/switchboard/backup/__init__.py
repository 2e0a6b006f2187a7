"""Backup and restore of Switchboard's learned state and config (`switchboard backup` / `switchboard restore`)."""
