"""`python -m safe_dist.export`: `safe_dist.export.cli`, its flags listed by --help."""

from absl import app
from absl import flags

from safe_dist.export import cli

__doc__ = cli.__doc__  # the usage text of --help
cli.define_flags()
flags.adopt_module_key_flags(cli)
app.run(cli.main)
