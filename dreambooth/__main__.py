from .console import quiet_libraries

quiet_libraries()  # before any library is imported: they read their verbosity when they load

from .cli import main  # noqa: E402

raise SystemExit(main())
