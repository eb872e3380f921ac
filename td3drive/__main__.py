"""``python -m td3drive``: the ``td3drive`` command (:func:`td3drive.app.cli.main`)."""

from td3drive.app.cli import main

raise SystemExit(main())
