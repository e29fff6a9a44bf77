from snat_sync.cli import main

raise SystemExit(main())
