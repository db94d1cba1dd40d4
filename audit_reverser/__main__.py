from audit_reverser.cli import main

raise SystemExit(main())
