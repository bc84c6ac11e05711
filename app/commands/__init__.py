"""Command-line commands that work without the service or its database.

Each module exposes a list of :class:`click.Command` objects that ``app/cli.py`` adds
to the ``vmigrate`` group (for example :data:`app.commands.images.images_commands`).
"""
