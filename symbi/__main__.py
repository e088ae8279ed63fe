from symbi.main import main

raise SystemExit(main())
