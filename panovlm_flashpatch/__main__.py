from .doctor import main

raise SystemExit(main())
