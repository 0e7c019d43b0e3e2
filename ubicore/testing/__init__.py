"""Helpers for tests of ubicore and of applications built on it."""
