from p2pinfer.cli import main

raise SystemExit(main())
