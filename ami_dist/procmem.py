"""This process's memory by kind, as Linux counts it in ``/proc/self/smaps_rollup`` (bytes per field).

``Private_Dirty`` is what the process wrote itself (its heap, its arrays); ``Shared_Clean`` is file pages
(a memory-mapped corpus) that another process maps too; ``Private_Clean`` such pages only it maps so far.
"""

from __future__ import annotations


def smaps_rollup() -> dict[str, int]:
    fields = {}
    with open("/proc/self/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields
