"""The embedded demo: its corpus served over loopback HTTP, run end to end."""
