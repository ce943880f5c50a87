"""kd_cli: the application around kd/ (train.py, sweep.py, report.py): the config and its CLI, run directories,
run records and progress lines, wandb's environment, sweep specs and trial processes. kd/ never imports it, so a
user who copies kd/ into their own code gets the library without this machinery."""
