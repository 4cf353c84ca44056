"""Recurrence primitives: pure functions, each with a sequential ``reference`` loop and fast modes."""
