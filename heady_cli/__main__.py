from heady_cli.main import main

raise SystemExit(main())
