"""Disk image formats."""
