"""Booting guests: boot code and images dvmm builds itself (e.g. the demo boot disk)."""
