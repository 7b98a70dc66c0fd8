"""What every command of the CLI shares: the one-line user error and the help formatter."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """Bad user input: printed as one line, exit status 2."""


class Help(argparse.HelpFormatter):
    """Shows a flag's default only when it has a real one (not None/False), so no "(default: None)" noise."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and not any(action.default is x for x in (None, False, argparse.SUPPRESS)):
            text += f" (default: {action.default})"
        return text
