"""Check that a built docs site works offline: no page loads a script, stylesheet, font or
image from the network (links to other sites are fine: they are navigation, not resources).

Usage: ``python3 docs/tools/check_site.py site`` (CI runs it after building). Exit code 1 and
one line per offending reference when something would be fetched at view time.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

#: Resource loads in HTML and CSS that would reach the network when the page is viewed.
REMOTE_RESOURCE = re.compile(
    r"""<script[^>]+src=["'](?:https?:)?//"""
    r"""|<link[^>]+href=["'](?:https?:)?//[^"']+["'][^>]*rel=["']?(?:stylesheet|preload|icon)"""
    r"""|<link[^>]+rel=["']?(?:stylesheet|preload|icon)[^>]+href=["'](?:https?:)?//"""
    r"""|<img[^>]+src=["'](?:https?:)?//"""
    r"""|@import\s+(?:url\()?["']?(?:https?:)?//"""
    r"""|url\(["']?(?:https?:)?//""",
    re.IGNORECASE,
)


def remote_resources(site: Path) -> list[str]:
    """``path:line: text`` of every remote resource load in the site's HTML and CSS."""
    found = []
    for path in sorted(site.rglob("*")):
        if path.suffix not in (".html", ".css") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in REMOTE_RESOURCE.finditer(line):
                snippet = line[match.start() : match.start() + 120]
                found.append(f"{path.relative_to(site)}:{number}: {snippet}")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / "index.html").is_file():
        print("usage: check_site.py SITE_DIR (a built site with an index.html)", file=sys.stderr)
        return 2
    found = remote_resources(Path(argv[0]))
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} remote resource(s): the site would not work offline")
        return 1
    print("offline: no page loads a remote script, stylesheet, font or image")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
