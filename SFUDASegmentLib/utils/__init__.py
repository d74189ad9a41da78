"""Small helpers every part of the library uses: devices and memory, progress and cancel, lazy exports."""
