"""Grids of runs and reports over them: ``incremental grid`` and ``incremental report``.

- :mod:`.spec`: the grid file and its cells;
- :mod:`.runner`: manifest, skip / resume logic, status; :mod:`.launchers`: local processes, submitit;
- :mod:`.collect`: reading results.json files and grouping runs by setting; :mod:`.report` and
  :mod:`.report_plots`: the table and the plots. The CLI subcommands are ``incremental/commands/grid.py``
  and ``incremental/commands/report.py``.
"""
