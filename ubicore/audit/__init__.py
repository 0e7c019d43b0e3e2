"""The audit trail (DESIGN.md §8): what happened, who did it, and proof nobody edited it.

``chain`` holds the tamper-evident records (hash chain, MAC, signed checkpoints, verify);
``keys`` the audit key file and the checkpoint file, both kept apart from the trail.
"""
