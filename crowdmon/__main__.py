from crowdmon.cli import main

raise SystemExit(main())
