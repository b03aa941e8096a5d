from convcli.entry import main

main()
