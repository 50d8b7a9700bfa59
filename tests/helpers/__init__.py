"""Slow, obviously correct references and small problem settings shared by the tests."""
