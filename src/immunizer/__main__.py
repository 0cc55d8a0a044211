from immunizer.cli import main

main()
