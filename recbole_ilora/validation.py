"""Checks of configuration values, with RecBole-style messages that name the offending key."""

import numbers


def require_int(config, key, minimum):
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Make sure '{key}' is an integer >= {minimum}, got {value!r}.")


def require_float(config, key, low, high, include_high=False):
    value = config[key]
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and low <= value and (value <= high if include_high else value < high)
    if not ok:
        bracket = "]" if include_high else ")"
        raise ValueError(f"Make sure '{key}' is a number in [{low}, {high}{bracket}, got {value!r}.")


def require_positive(config, key):
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"Make sure '{key}' is a number > 0, got {value!r}.")


def require_str_list(config, key):
    value = config[key]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(item, str) for item in value):
        raise ValueError(f"Make sure '{key}' is a non-empty list of module names, got {value!r}.")


def require_choice(config, key, choices):
    if config[key] not in choices:
        raise ValueError(f"Make sure '{key}' in {list(choices)}, got {config[key]!r}.")


def require_bool(config, key):
    if not isinstance(config[key], bool):
        raise ValueError(f"Make sure '{key}' is True or False, got {config[key]!r}.")
