"""Scenarios: deterministic streams of experiences built from a seed."""
from .digits import SplitDigits, load_digits_arrays, split_digits
from .digits_transfer import digits_transfer

__all__ = ["SplitDigits", "split_digits", "load_digits_arrays", "digits_transfer"]
