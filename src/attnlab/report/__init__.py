"""Plots and the HTML report. ``attnlab.report(run_dir)`` renders ``run_dir/report.html``."""

from .._lazy import lazy_package

lazy_package(__name__, {}, call="attnlab.report.html:render_report")
