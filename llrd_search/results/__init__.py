"""What a finished study turns into: report, plots, export, the final fine-tune, the dashboard."""
