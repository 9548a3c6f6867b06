"""The one rule for object names (VMs, nodes, images, volumes, snapshots), shared by every
layer: 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NAME_RULE = "1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
