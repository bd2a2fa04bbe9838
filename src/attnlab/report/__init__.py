"""Plots and the HTML report. ``attnlab.report(run_dir)`` renders ``run_dir/report.html``."""

from .._callable import make_callable

make_callable(__name__, "attnlab.report.html:render_report")
