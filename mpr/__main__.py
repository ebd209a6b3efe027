from mpr.cli import app

app(prog_name="mpr")
