from dpolab.cli import main

main()
