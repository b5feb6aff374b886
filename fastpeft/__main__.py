from fastpeft.cli import main

raise SystemExit(main())
