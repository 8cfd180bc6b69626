from xtalsym.cli import main

raise SystemExit(main())
