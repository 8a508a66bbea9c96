"""``skinflint shadow enable``: switch a strategy back on after the shadow guard switched it
off."""

from __future__ import annotations

import argparse

from skinflint.cli.output import new_console, print_json
from skinflint.config import Settings

__all__ = ["cmd_shadow"]


def cmd_shadow(args: argparse.Namespace, settings: Settings) -> int:
    from skinflint.analytics.shadow_switch import describe, enable

    switch = enable(settings, args.feature, args.strategy, db=args.db, url=args.url,
                    admin_key=args.admin_key)
    if args.json:
        print_json(switch.as_dict())
    else:
        new_console().print(describe(switch), soft_wrap=True)
    return 0
