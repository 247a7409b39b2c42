"""The benchmark suite: ``python -m bench`` runs every script in this directory and reports against the targets.

Each script (``throughput.py``, ``qemu.py``, ...) also runs on its own and
prints one JSON object last.  The suite's own modules, one concern each:

* ``_suite``: which scripts run, with which arguments at each level (dry run, quick, full);
* ``_runner``: running one script as a subprocess and keeping its last JSON object;
* ``_machine``: what the results were measured on;
* ``targets``: the figures, their baselines and the targets the issues set;
* ``_summary``: medians, spreads and ratios, printed as a table or as Markdown;
* ``plots``: the scaling curves as PNG files (needs matplotlib, the ``bench`` extra).
"""
