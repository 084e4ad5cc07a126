"""The report: gather stage outputs under run roots, aggregate over seeds, render the paper's tables and plots."""
